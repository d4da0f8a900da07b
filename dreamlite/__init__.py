"""dreamlite: derive a DreamLite-class mobile diffusion model from a server U-Net."""
__version__ = "0.1.0"
