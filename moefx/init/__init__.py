"""Dense FFN -> experts: the FFN template, the init strategies (upcycle, split, drop-upcycle, random), clustering."""
