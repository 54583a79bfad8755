"""`python -m demo`: the main job (demo/job.py), as `make demo` runs it."""
from demo.job import main

if __name__ == "__main__":  # a spawned stage worker imports this module too, and must not start the job
    main()
