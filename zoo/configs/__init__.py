"""Hydra configs shipped inside the package (train.yaml + groups task/ quant/ data/ trainer/)."""
