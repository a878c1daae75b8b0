import sys

from dcgan_ray.cli import main

sys.exit(main())
