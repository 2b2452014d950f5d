"""The deployable Space shell: Hugging Face Spaces runs this file; the app itself is soppu_hub.space.app."""

from soppu_hub.space.app import main

if __name__ == "__main__":
    main()
