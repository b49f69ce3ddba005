import sys

from defenda_flower.example import main

sys.exit(main())
