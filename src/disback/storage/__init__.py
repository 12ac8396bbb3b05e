"""Everything on disk: atomic files, safetensors weights with exact loading, run folders, and model files (a typed
description in the header, and a registry of model kinds that says how each kind is rebuilt)."""
