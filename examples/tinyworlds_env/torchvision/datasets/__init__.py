"""Empty: TinyWorlds imports `torchvision.datasets` but uses none of it."""
