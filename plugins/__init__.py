"""Bundled trainer backends for `ftplan run`, registered through the same hooks third parties use.

Empty until the trainer-plugin work lands; see the README's architecture section.
"""
