"""Dense FFN -> experts: the FFN template, the init strategies (upcycle, split, drop-upcycle, random),
clustering, and from_ffn (``MoE.from_ffn``'s body)."""
