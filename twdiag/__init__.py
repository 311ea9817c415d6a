"""TinyWorlds training diagnostics: the library behind the skill's scripts."""
__version__ = "0.2.0"
