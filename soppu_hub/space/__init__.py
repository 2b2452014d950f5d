"""The Gradio Space: its logic without Gradio, and the app that lays it out."""
