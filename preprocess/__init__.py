"""Pure preprocessing for Eagle2: media decoding, IAP tiling, frame sampling, context budget."""
