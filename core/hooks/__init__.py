"""The plugin machinery: the hook specifications, the plugin manager that loads built-in and third-party
plugins and keeps the rules (name clashes, which package provided what), the registries of training
algorithms and components, and the catalogue of objectives (registry.yaml, parameter specs).

It knows no contract class of the layers above: what a registration must be is checked by the check each
registry hands it.

May import: distillzoo.errors, distillzoo.atomic.
"""
