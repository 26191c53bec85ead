import sys

from massl_ray.cli import main

sys.exit(main())
