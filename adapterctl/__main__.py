from adapterctl.cli import main

main()
