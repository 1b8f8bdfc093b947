"""The composition root: the ``joulegate`` command, configuration assembly, and the wiring of each process.

The only package that imports ``proxy``, ``meter`` and ``sim`` together. Each subcommand lives in
``app.commands`` and imports what its process runs, and nothing more: ``joulegate meter`` loads no request-path
module (a test holds it to that)."""
