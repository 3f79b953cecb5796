"""One ``torch.library`` custom op per file (schema, fake, autograd, default implementation)."""
