"""Splat generators and their parts.

- ``generator``: the interface (``SplatGenerator``, ``PromptEmbeds``), shared by
- ``tiny`` (``TinySplatGenerator``, the embedded default prior) and
- ``diffsplat`` (``DiffSplatGenerator``, DiffSplat PixArt-Σ from a local directory);
- ``mv_attention``: the multi-view PixArt transformer; ``lora``: adapters through peft;
- ``schedulers``: samplers; ``world``: the tiny prior's procedural world.

Import from the submodules; this package imports nothing heavy by itself.
"""
