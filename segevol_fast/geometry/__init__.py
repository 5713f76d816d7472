"""Geometry shared by inference and training: the official sliding-window grid and the official
prompt primitives (a mask's box, prompts mapped between the crop and zoom-out frames)."""
