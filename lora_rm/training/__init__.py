"""Step 3, training: check inputs, set up a run, the loop on `accelerate`, checkpoints, and the outputs."""
