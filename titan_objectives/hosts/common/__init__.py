"""Training-loop pieces every host shares: plain PyTorch, no torchtitan import."""
