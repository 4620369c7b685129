"""The training loop (`engine.fit`) and what it is made of: timm models, the input noise
(augment), the saved training state, the torchrun ranks, and the selection of pseudo
labels the student learns from. Plain torch over `data`."""
