"""Built-in specs, one layer per file; installed as ``gradtool.builtin_specs``."""
