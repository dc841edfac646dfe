"""Videos to frames: annotations, synthetic mp4 clips, decoding and the shared memory-mapped frame cache."""
