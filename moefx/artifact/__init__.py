"""On-disk formats: save/load of moefx outputs, the conversion record, model files, atomic directories, weight files."""
