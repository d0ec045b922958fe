"""usema: USEMA (UNet + SEMA blocks) medical image segmentation on MONAI."""

__version__ = "0.4.1"
