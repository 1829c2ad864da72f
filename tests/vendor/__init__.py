"""Code copied from other projects for the tests, each file saying where from and what was changed."""
