"""Built-in distillzoo plugins.

Each module here is a plugin exactly like a third-party one: ``@dz.hookimpl``
functions, loaded by the core through ``DEFAULT_PLUGINS`` (never through entry
points), and described by the repository's registry.yaml.

May import: distillzoo.training, distillzoo.curate, distillzoo.teacher, distillzoo.config, distillzoo.objectives,
distillzoo.models, distillzoo.data, distillzoo.hooks, distillzoo.kernels, distillzoo.errors, distillzoo.atomic.
"""
