"""Does a compressed adapter still do what its original did? Functional checks on the base model, after compression.

`replies.py` the prompt as a chat turn and greedy generation (one pad-token rule); `verify.py` next-token and reply
agreement on probe prompts (--verify); `task_eval.py` task scores on examples with answers (--eval-file). They take
model and adapter folders: the pipeline resolves Hub ids first.
"""
