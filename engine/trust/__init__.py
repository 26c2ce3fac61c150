"""The trust boundary: the only code that reads what agents write.

`reader` opens agent-written files (inbox requests, control files, results, logs) as
untrusted bytes; `git` is the one git runner, hardened so no repository configuration,
hook or pointer an agent could have written acts on the host; `exchange` brings an
agent's work from its own repository into the trusted one. Nothing else in the engine
opens an agent-written path or runs git.
"""
