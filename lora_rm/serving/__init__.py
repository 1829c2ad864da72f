"""Step 5, serving: `lora-rm serve`, the reward model behind HTTP."""
