from pima_hpc.cli import main

raise SystemExit(main())
