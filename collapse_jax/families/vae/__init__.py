"""The VAE family: Flax VAEs on MNIST trained on their predecessors' samples."""
