"""Step 2, the model: load a base as a reward model with LoRA, collate batches, read rewards, the scoring
engine, and saved model folders."""
