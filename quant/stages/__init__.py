"""The pipeline stages that act on a wrapped UNet: calibration (02), fine-tuning (03) and its optimizer groups."""
