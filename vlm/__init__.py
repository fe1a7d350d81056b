"""The VLM connector pipeline: vision encoders, connectors, splicing, tiling, HF family checkpoints."""
