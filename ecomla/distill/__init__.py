"""Stage 1: layer-wise alignment (ILD) and end-to-end knowledge distillation, on accelerate."""
