"""Feed-forward pose estimation for N >> views: preprocessing, reference selection, chunks, hand."""
