"""Training the MiniCPM way: muP parameterisation (`mup`), learning-rate schedules (`schedules`:
Warmup-Stable-Decay and cosine) and fine-tuning data (`data`: chat records to ids and labels)."""
