"""The data layer: formulas, random-effects terms, designs, conditioning, simulation.

Nothing here knows about estimation: it turns a DataFrame and an lme4 formula into the
fixed-effects matrix, the response and the grouping structure that the layers above use.
See ``docs/architecture.rst``.
"""
