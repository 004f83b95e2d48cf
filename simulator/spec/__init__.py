"""The inputs: model, hardware/cluster, parallel layout and training run specs (frozen pydantic models
mapping 1:1 onto DeepSeek/HF ``config.json`` and the CLI), the number types their fields use
(``numbers``: no bools for numbers, finite floats), the one reader of JSON input (``json_input``:
bounded, strict, UTF-8) and the one formatter of their errors.

May import: pydantic only. Everything else of moeplan may import ``spec``.
"""
