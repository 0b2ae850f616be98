"""Models: their shapes, their weights and their pure forward functions; nothing of tiers.

``opt.py`` is the OPT family's mathematics; ``family.py`` the model-family interface, with
``llama.py`` (Llama, Mistral, Qwen2) and ``opt_family.py`` behind it, and ``families.py`` to
find one; ``checkpoint.py`` reads HF checkpoint folders or draws seeded synthetic weights;
``quickstart.py`` builds the small ``builtin:quickstart`` checkpoint locally.
"""
