"""The pieces of the exported loader. Each is an importable module whose text below its `# PART` line is
pasted into qpack_load.py: base.py (container, checks, dequantization, state dict) first, then one
`<codec>_part.py` per codec the loader should read (each registers its decoder in base._CODECS)."""
