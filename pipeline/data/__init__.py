"""Data layer: precomp readers, vocab, the embedded dataset, datasets and samplers."""

# SCAN precomp: caption j belongs to image j // CAPS_PER_IMAGE (every split, every dataset)
CAPS_PER_IMAGE = 5

# Longest caption, in token ids with the start/end markers, that a tokenizer lets through:
# longer ones are truncated (with a warning and a count in validate-data). COCO's and
# Flickr30K's longest captions are well under 100 words; without a cap one 1 MB line pads
# every batch it lands in to ~10^5 positions. A tokenizer may set a lower `max_length`.
MAX_CAPTION_TOKENS = 128
