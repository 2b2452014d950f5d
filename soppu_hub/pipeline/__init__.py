"""The main job, pull -> compress -> card -> push, as one library call."""
