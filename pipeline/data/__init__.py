"""Data layer: precomp readers, vocab, the embedded dataset, datasets and samplers."""

# SCAN precomp: caption j belongs to image j // CAPS_PER_IMAGE (every split, every dataset)
CAPS_PER_IMAGE = 5
