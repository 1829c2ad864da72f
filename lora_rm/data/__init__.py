"""Step 1, data: read preference files, check rows, tokenize them into pairs, and plan batches."""
