"""The napari plugin: open scans with their geometry, prompt SegVol interactively, keep the organs.

The modules here split the plugin's logic from its user interface: `coords` (a volume's affine as
a napari layer transform, world <-> voxel), `prompts` (viewer clicks, rectangles and typed names
-> segment()'s prompt arguments), `labels` (the organs found so far as one label map, with undo)
and `reader` (napari's reader hook) use numpy only and import neither napari nor Qt, so they are
tested without a display. `widget` is the dock widget that drives a session through them.

Nothing is imported here: napari loads each module by name through the manifest (napari.yaml).
"""
