"""Weight quantization: formats (format.py), the user's and the checkpoint's choice (config.py),
and which layers it applies to (apply.py, which imports the layers: import it by name)."""
