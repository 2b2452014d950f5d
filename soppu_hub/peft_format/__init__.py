"""PEFT adapter folders as servers see them: reading, writing, file names and rank rules."""
