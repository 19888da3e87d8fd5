"""``memguard fetch``, the one step that uses the network: :mod:`memguard.fetch.command` (the task), and the
pieces it is made of, which ``memguard check`` reads too: :mod:`.sources` (the ``sources.<input>`` nodes),
:mod:`.manifest` (what was fetched), :mod:`.http` and :mod:`.hub` (files), :mod:`.images` (image URL lists).
This package imports nothing, so ``memguard check`` can read the pieces without importing the command."""
