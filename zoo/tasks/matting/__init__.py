"""Video matting (BiMatting): task, data, metrics, release hooks and the seed ablation table."""
