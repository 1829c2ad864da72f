"""Step 4, evaluation: metrics and charts on preference pairs, and `RewardModel`, the trained model in use."""
