"""Fine-tuning SegVol: datasets, the official loss and prompt mix, metrics, the trainer."""
